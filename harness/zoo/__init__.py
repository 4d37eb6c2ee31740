"""Models, task families, datasets and the presets that pair them."""
__all__: list[str] = []
