"""Device SDK: enroll, renew and listen for notices with keys that never leave the TPM."""
