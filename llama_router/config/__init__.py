"""The profiles.yaml schema and its loading, Hugging Face references: knows nothing of serving."""
