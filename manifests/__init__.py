"""The packaged manifests (``*.toml`` beside this file): ``distillkit manifests`` lists them,
``distillkit build NAME`` builds one by name and ``distillkit init NAME`` copies one to edit."""
