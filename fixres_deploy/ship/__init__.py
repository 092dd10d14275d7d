"""The bundle for production, its torch-free runtime and the Triton repository."""
