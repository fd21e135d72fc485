# For Packer 1.7+ only (1.6.6 rejects required_plugins): `packer init packer/plugins`
# installs the qemu builder, then `packer build packer/` runs the same template as 1.6.6.
packer {
  required_plugins {
    qemu = {
      source  = "github.com/hashicorp/qemu"
      version = ">= 1.0.9"
    }
  }
}
