"""The DVC stages of dvc.yaml, one command-line module each."""
