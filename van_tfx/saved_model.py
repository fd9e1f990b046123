"""SavedModel details TF Serving cares about and `tf.saved_model.save` cannot express."""

import os

CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"
PREDICT_METHOD_NAME = "tensorflow/serving/predict"


def mark_classification_signature(export_dir: str, signature_key: str) -> None:
    """Give `signature_key` TF Serving's classify method name, which strict servers require."""
    # TF2's `tf.saved_model.save` writes every signature as a predict signature; TF Serving run with
    # `--enable_signature_method_name_check` rejects those in Classify ("Expected classification
    # signature method_name to be tensorflow/serving/classify"); without the flag (its default) it
    # takes them. Rewriting the method name in saved_model.pb is the standard way to serve either;
    # loading code ignores method names, so nothing else changes.
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(export_dir, "saved_model.pb")
    with tf.io.gfile.GFile(path, "rb") as f:
        saved_model = saved_model_pb2.SavedModel.FromString(f.read())
    for meta_graph in saved_model.meta_graphs:
        if signature_key not in meta_graph.signature_def:
            raise KeyError(f"{export_dir} has no signature {signature_key!r} to mark as classify")
        meta_graph.signature_def[signature_key].method_name = CLASSIFY_METHOD_NAME
    # A new file renamed over the old one: never half a saved_model.pb, and correct on file
    # systems whose writers do not truncate an existing file (TensorFlow's ram://, used in tests).
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(saved_model.SerializeToString())
    tf.io.gfile.rename(tmp, path, overwrite=True)
