"""MLflow: tracking URIs and runs, the pyfunc wrapper, and registration with champion gating."""
