"""Running a trained model: the Detector (images to detections in their own pixels), overlays."""
