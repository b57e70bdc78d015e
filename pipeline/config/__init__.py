"""params.yaml: loading it, the typed settings of each section, checking every key against them."""
