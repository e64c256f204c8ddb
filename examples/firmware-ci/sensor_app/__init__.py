"""A small device application: a sensor whose identity comes from its TPM.

``first_boot`` enrolls the device through the tpm-enroll device SDK (TPM-attested: no
token, no shared secret) and stores the certificate; ``serve`` keeps it alive with the
SDK's agent (signed notices over MQTT, renewal) and, when the operator revokes the
device, puts the sensor in lockdown: it stops reporting and records why.
"""
