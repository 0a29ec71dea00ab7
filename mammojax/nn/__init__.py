"""Layers shared by the models.

Building blocks: ``initializers`` (torch's default weight inits), ``partitioning`` (logical axis
names of kernels), ``conv_blocks`` (2D / 3D conv-norm-activation, instance norm, stride-2
transposed conv), ``resize`` (2D / 3D resampling as torch does it), ``transformer`` (pre- or
post-norm self-attention block), ``depthwise_conv``, ``time_encoding``, ``fusion_barrier``.

Backbones and heads: ``resnet`` (Mirai's ResNet-18 trunk and torchvision's ResNet-18/34/50),
``vit`` (torchvision / timm ViT-B/16, N-d patch embedding), ``efficientnet`` (Mammo-CLIP's B2),
``fpn``, ``swin``, ``set_transformer``, ``mil_pooling``, ``cumulative_risk``. Backbones sow their stage
outputs into the ``'intermediates'`` collection and take their activation as an attribute, for
attribution methods (GradCAM, guided backpropagation).

Registration: ``warp`` (public API: sampling, warping, displacement algebra, Jacobians) over
``sampling`` (the interpolation kernels).
"""
