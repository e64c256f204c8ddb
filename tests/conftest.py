pytest_plugins = ["tpm_enroll_testing", "tests.support.fixtures", "tests.support.fleet"]
