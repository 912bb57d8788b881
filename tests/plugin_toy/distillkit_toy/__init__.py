"""distillkit-toy: a test plugin with a windowed pipeline, a teacher model set up once per
worker and run on batches, a distillation trainer and a synthetic source."""
