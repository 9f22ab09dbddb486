"""The applications on the model side: an image generator on ImageBind embeddings, an open-vocabulary detector."""
