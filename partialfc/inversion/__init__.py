"""Model inversion: synthesize face images from a trained backbone alone.

ArcFace (TPAMI) shows that a face model trained with a margin softmax can be
inverted without any training data: start from noise, optimize the input pixels
so that the embedding hits a target while the batch statistics at every
BatchNorm layer match the running statistics the layer stored during training
(the DeepInversion prior). The pieces live in small modules:

- ``bn_prior``  -- forward hooks that measure batch mean/variance at every
  BatchNorm2d and the distance to the stored running statistics;
- ``losses``    -- the image priors (total variation, L2) and the cosine loss;
- ``targets``   -- the embedding targets: class centers, aligned images, .npy;
- ``optimize``  -- the optimization loop (Adam, cosine decay, jitter + flips);
- ``report``    -- PNGs, the grid and the JSON report, written atomically.

``python -m partialfc.invert`` is the command line tool that ties them together.
"""
