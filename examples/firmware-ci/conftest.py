# The fixtures come from the tpm-enroll package's pytest plugin, named explicitly.
pytest_plugins = ["tpm_enroll_testing"]
