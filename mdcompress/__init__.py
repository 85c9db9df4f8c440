"""mdcompress: everything around the design card's stages.

The card's files at the repository root hold the method: ``compress_model.py`` (the command line, the
preprocessing hook, ``run()`` as the list of stages), ``decomposition.py`` (the paper's pipeline),
``matrix_decomposition.py`` (the low-rank layers and the surgery) and ``distillation/`` (losses and the
training loop). This package holds what serves them: the data, the evaluation, the plan, the rank
allocation, the output folder, the ONNX export and the translation command.
"""
