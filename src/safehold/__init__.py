"""Safehold: confidential computing for patient records.

Plaintext patient records exist only inside an attested TEE; disks, databases and networks
see ciphertext. See ``README.md`` and ``docs/`` for the concepts (RFC 9334 RATS roles).
"""

__version__ = "0.1.0"
