"""Series -> tensors: volumes with exact patient geometry (:mod:`pipeline.tensors.volume`)."""
