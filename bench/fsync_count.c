/* Counts fsync/fdatasync/msync calls of the process it is preloaded into
 * (LD_PRELOAD), including those made by C libraries such as LMDB that a
 * Python-level wrapper cannot see.  bench_durability.py reads the counter
 * through ctypes (fsync_count()). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

static unsigned long count;
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_msync)(void *, size_t, int);

unsigned long fsync_count(void) { return __atomic_load_n(&count, __ATOMIC_RELAXED); }

int fsync(int fd)
{
	if (!real_fsync)
		real_fsync = dlsym(RTLD_NEXT, "fsync");
	__atomic_add_fetch(&count, 1, __ATOMIC_RELAXED);
	return real_fsync(fd);
}

int fdatasync(int fd)
{
	if (!real_fdatasync)
		real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
	__atomic_add_fetch(&count, 1, __ATOMIC_RELAXED);
	return real_fdatasync(fd);
}

int msync(void *addr, size_t len, int flags)
{
	if (!real_msync)
		real_msync = dlsym(RTLD_NEXT, "msync");
	__atomic_add_fetch(&count, 1, __ATOMIC_RELAXED);
	return real_msync(addr, len, flags);
}
