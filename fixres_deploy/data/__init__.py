"""Image folders and the generated demo data set."""
