"""Feature names shared by the data tools, Transform, the Trainer and the serving signatures."""

# Raw ImageNet-style tf.Example keys (TF's build_imagenet_data.py / imagenet_to_gcs.py layout).
IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_CHANNELS = "image/channels"
IMAGE_COLORSPACE = "image/colorspace"
IMAGE_FILENAME = "image/filename"
LABEL = "image/class/label"  # int64, 1-based position of the synset in the sorted synset list
SYNSET = "image/class/synset"
CLASS_TEXT = "image/class/text"

# Transform outputs (what the Trainer reads). IMAGE holds the uint8 RGB pixels of a
# [stored, stored, 3] image as raw bytes (tf.io.decode_raw(..., tf.uint8) + reshape): compact and
# lossless, never float32.
TRANSFORMED_IMAGE = "image"
TRANSFORMED_LABEL = "label"  # int64, 0-based class id from the TFT synset vocabulary
SYNSET_VOCABULARY = "synsets"  # TFT vocabulary file name: class id i -> line i

# Serving signature names and tensors.
SERVING_EXAMPLES_SIGNATURE = "serving_default"
PREDICT_IMAGES_SIGNATURE = "predict_images"
PREDICT_IMAGES_INPUT = "images"
# TF Serving's Classify API: a classify-method signature, input "inputs", outputs classes/scores.
CLASSIFY_SIGNATURE = "classify"
CLASSIFY_INPUT = "inputs"
# Serialized tf.Example -> Transform outputs (incl. the label); TFMA extracts labels through it.
TRANSFORM_FEATURES_SIGNATURE = "transform_features"
