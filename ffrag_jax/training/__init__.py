"""Training: the one trainer and its loop pieces (progress, metrics, checkpoints, health,
interrupts), the language-model step (:mod:`.train`) and its phases (:mod:`.loop`), the mesh
and partition rules (:mod:`.sharding`), the run folder (:mod:`.workdir`) and ``run``."""
