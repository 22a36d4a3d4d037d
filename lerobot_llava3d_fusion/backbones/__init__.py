"""Vision-language backbones: layouts, loaders (LLaVA 1.5, OneVision, LLaVA-3D) and their files."""
