"""The resumable sweep over resolutions x precisions x shapes, its store and the run pipeline."""
