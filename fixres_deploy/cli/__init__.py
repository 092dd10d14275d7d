"""The `fixres-deploy` command line."""
