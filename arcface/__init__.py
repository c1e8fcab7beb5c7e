"""Face verification: LFW download, MTCNN alignment, ArcFace training, FAISS search, evaluation."""

__version__ = "0.1.0"
