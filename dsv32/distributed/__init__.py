"""One model over many processes, as the model's layers see it: the parallel layout they are cut by and its
collectives (``parallel``) and the process groups the ranks meet in (``groups``). A leaf: it imports nothing of
dsv32 but ``dsv32.config``; the processes themselves are run by ``dsv32.engine.executor``."""
