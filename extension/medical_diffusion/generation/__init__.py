"""Image generation with trained embeddings: composable prompts, Euler ancestral sampling,
synthetic data sets, healthy->diseased interpolation, pathology composition, inpainting masks
and inpainting with a non-inpainting model (A1111 semantics throughout)."""
