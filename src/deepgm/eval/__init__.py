"""Evaluation: FID with a dataset-trained feature network, improved precision/recall, sliced Wasserstein."""

from deepgm.eval.features import AttributeClassifier, DigitClassifier, FeatureNet, evaluate_samples, get_feature_net
from deepgm.eval.metrics import fid, fid_of_samples, frechet_distance, precision_recall, sliced_wasserstein

__all__ = ["AttributeClassifier", "DigitClassifier", "FeatureNet", "evaluate_samples", "fid", "fid_of_samples",
           "frechet_distance", "get_feature_net", "precision_recall", "sliced_wasserstein"]
