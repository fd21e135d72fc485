"""The reference control plane: the AWS `backup-gateway` JSON API plus the gateway link."""
