"""Training the demo model: its corpus (``corpus``), a trainable V3.2 network (``network``), the checkpoint export
(``export``) and the ``dsv32 train-demo`` command (``demo``)."""
