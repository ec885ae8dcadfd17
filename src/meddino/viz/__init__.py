"""Feature visualisation: PCA maps of patch features, CLS attention maps, overlays."""
