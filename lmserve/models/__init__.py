"""The model families, one file each with its `ModelFamily` descriptors (`FAMILIES`), and
`registry`, which collects them and finds a family by the names checkpoints give it."""
