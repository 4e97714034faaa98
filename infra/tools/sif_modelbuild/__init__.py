"""Build-time only: export, quantize and verify the shipped models (torch lives here, never in Lambda)."""
