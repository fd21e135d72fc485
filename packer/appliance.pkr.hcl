# The appliance image: boots the base disk made by tools/image/make-base-disk.sh, installs the
# appliance, checks it runs, removes everything that must be unique per VM, and shuts down.
# Runs as it is with Debian's Packer 1.6.6 (qemu builder built in); newer Packer first needs
# `packer init packer/plugins` (the plugin requirement lives apart: 1.6.6 rejects it).
# Normally driven by tools/image/build-ova.sh, which sets every variable.

variable "base_disk" {
  type        = string
  description = "raw base disk from make-base-disk.sh"
}

variable "output_dir" {
  type = string
}

variable "stage_dir" {
  type        = string
  description = "DIR: DIR.tar holds the files to install: code, units, helpers (made by build-ova.sh)"
}

variable "ssh_private_key_file" {
  type        = string
  description = "the per-build key whose public half is in the base disk"
}

variable "accelerator" {
  type    = string
  default = "tcg"
}

variable "serial_log" {
  type    = string
  default = "/dev/null"
}

source "qemu" "appliance" {
  iso_url          = var.base_disk
  iso_checksum     = "none"
  disk_image       = true
  skip_resize_disk = true
  format           = "qcow2"
  disk_interface   = "virtio"
  disk_discard     = "unmap"
  net_device       = "virtio-net"
  accelerator      = var.accelerator
  memory           = 1024
  cpus             = 2
  headless         = true
  boot_wait        = "1s"
  vnc_bind_address = "127.0.0.1"
  output_directory = var.output_dir
  vm_name          = "appliance.qcow2"

  communicator         = "ssh"
  ssh_username         = "root"
  ssh_private_key_file = var.ssh_private_key_file
  ssh_timeout          = "5m"
  shutdown_command     = "systemctl poweroff"
  shutdown_timeout     = "2m"

  # Packer's default forward listens on 0.0.0.0 and its user network reaches the internet:
  # SSH on loopback only, and `restrict=on` so the build VM can send nothing beyond this host.
  qemuargs = [
    ["-netdev", "user,id=user.0,restrict=on,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
    ["-serial", "file:${var.serial_log}"],
  ]
}

build {
  sources = ["source.qemu.appliance"]

  provisioner "file" {
    source      = "${var.stage_dir}.tar"
    destination = "/tmp/stage.tar"
  }

  provisioner "shell" {
    script = "${path.root}/../tools/image/provision/install.sh"
  }

  provisioner "shell" {
    script = "${path.root}/../tools/image/provision/verify.sh"
  }

  # Last: what must be unique per VM or was only for the build goes (sshd and its keys, the
  # build key, machine-id, the identity the checks created, logs).
  provisioner "shell" {
    script = "${path.root}/../tools/image/provision/cleanup.sh"
  }
}
