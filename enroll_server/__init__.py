"""TPM-attested enrollment server: EST (RFC 7030) over TLS with a PKCS#11-backed CA."""
