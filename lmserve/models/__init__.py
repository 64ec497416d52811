"""The model families: one file each with its model classes, their `ModelFamily` descriptors
(`FAMILIES`) in the file of the same name in `families`, and `registry`, which collects them and
finds a family by the names checkpoints give it."""
