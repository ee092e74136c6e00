"""One model over many processes: the parallel layout the model's layers are cut by (``parallel``), the process
groups (``groups``), and the driver/worker execution that runs each scheduled step on every rank (``executor``)."""
