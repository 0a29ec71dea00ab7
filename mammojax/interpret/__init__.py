"""Attribution methods: which input pixels a trained model's prediction rests on (GradCAM and
relatives, coming next). MIL attention heatmaps live beside the MIL model
(:mod:`mammojax.models.mil.heatmaps`), detection metrics in :mod:`mammojax.metrics.detection`,
overlay pictures in :mod:`mammojax.viz.overlays`."""
