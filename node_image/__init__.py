"""The node image: its Dockerfile and the ``worker`` package every GPU node runs."""
