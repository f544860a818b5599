"""`workbench quantize`: recipes, calibration data, methods, and the quality report against the source."""
