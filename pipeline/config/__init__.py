"""params.yaml (loading, typed settings per section, the check of every key) and user errors."""
