"""The model families' descriptors: one file per family file of `lmserve.models`, each with its
`FAMILIES`, which say how the family's checkpoints are named and read. They import no PyTorch (a
descriptor names its model class by import path), so reading a checkpoint's configuration
(`lmserve info`) does not load it."""
