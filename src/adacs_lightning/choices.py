"""Values of settings that command-line tools check before importing the training stack."""

#: Intensity scalings of image files to [0, 1] (``data.intensity``, ``adacs-register --intensity``).
INTENSITY_MODES = ("minmax", "percentile")
#: Formats ``adacs-export`` writes.
EXPORT_FORMATS = ("torchscript", "export", "onnx")
#: What weights the data term during registration-time refinement: the run's score map, or nothing (``Ŝ ≡ 1``).
REFINE_WEIGHTS = ("score", "none")
#: How many pairs of a folder (``adacs-register --csv``) are refined at once.
REFINE_BATCH = 8
#: The reference recipe's own settings (``ReferenceAdaCS``) and the value AdaCS itself trains with.
REFERENCE_RECIPE_SETTINGS = {"score_residual": "reuse", "momentum_mode": "paper", "reference_leak": False}
