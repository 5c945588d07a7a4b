"""The toy world: a procedural captioned world small enough to pretrain an SD2-shaped model on two
CPU cores, so DreamBooth's claims (the subject is learned, the class keeps its meaning) can be
measured without a GPU or a hub. See :mod:`.world` for the world itself."""
