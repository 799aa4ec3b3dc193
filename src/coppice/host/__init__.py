"""Host helpers that know nothing of Coppice: mounts and process identities.

They import nothing from the rest of the package and raise only the standard library's
exceptions, so every layer may use them and a port to another host (FreeBSD) replaces this
package alone."""
