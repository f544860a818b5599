"""Code that runs inside an engine's own process (never imported by the workbench): reference kernels for
what an engine's CPU build lacks, loaded through the engine's own plugin mechanism."""
