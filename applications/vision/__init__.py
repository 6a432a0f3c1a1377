"""The image side both applications share: datasets, loaders and augmentation (:mod:`~applications.vision.data`)
and the small CNN (:mod:`~applications.vision.small_cnn`). Imports no application."""
