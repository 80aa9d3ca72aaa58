"""The node worker: consumes a run's queue, samples frames with ffmpeg, runs a Keras model.

Run it with ``python -m worker`` (the image's working directory holds this package) or
``python -m node_image.worker`` from a checkout. See ``loop`` for the queue protocol.
"""
