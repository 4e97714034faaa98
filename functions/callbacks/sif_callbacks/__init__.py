"""CallbackFunction: job and batch callbacks, delivered from the callbacks queue."""
