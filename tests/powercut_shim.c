/* A power-cut simulator, loaded with LD_PRELOAD into the process under test.
 *
 * Files under $PCUT_ROOT are watched.  What a machine would still have on
 * disk after losing power is kept in a shadow tree ($PCUT_SHADOW): on every
 * fsync/fdatasync of a watched file, its whole current content is copied
 * there (written to a temporary name, then renamed, so a process stopped in
 * the middle of a sync leaves the previous durable copy).  Every write to a
 * watched file is noted in a journal ($PCUT_JOURNAL), one line each:
 *
 *     W <path> <offset> <length>   bytes written (write, pwrite, writev, ...)
 *     T <path> <length>            ftruncate
 *     S <path>                     fsync / fdatasync returned
 *     R <from> <to>                rename
 *     U <path>                     unlink
 *
 * (paths relative to $PCUT_ROOT).  The test reads the journal to know which
 * 4 KiB pages of each file were written since its last sync: those are the
 * pages a power cut may keep or lose, in any combination.
 *
 * Namespace operations (create, rename, unlink) are treated as durable at
 * once, as a journaling filesystem that commits them in order would make
 * them; only file data waits for a sync.  The real fsync is skipped (the
 * test's own disk is not what is being tested), which also makes it fast.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static char root[PATH_MAX];
static size_t rootlen;
static char shadow[PATH_MAX];
static int jfd = -1;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev2)(int, const struct iovec *, int, off_t, int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static ssize_t (*real_sendfile)(int, int, off_t *, size_t);
static ssize_t (*real_copy_file_range)(int, off_t *, int, off_t *, size_t, unsigned int);

#define REAL(name) real_##name = dlsym(RTLD_NEXT, #name)

__attribute__((constructor)) static void pcut_init(void)
{
	REAL(write); REAL(pwrite); REAL(pwrite64); REAL(writev); REAL(pwritev);
	REAL(pwritev64); REAL(pwritev2); REAL(ftruncate); REAL(ftruncate64);
	REAL(fsync); REAL(fdatasync); REAL(rename); REAL(renameat); REAL(renameat2);
	REAL(unlink); REAL(unlinkat); REAL(sendfile); REAL(copy_file_range);
	const char *r = getenv("PCUT_ROOT"), *s = getenv("PCUT_SHADOW"), *j = getenv("PCUT_JOURNAL");
	if (!r || !s || !j || !realpath(r, root) || !realpath(s, shadow))
		return;
	rootlen = strlen(root);
	jfd = open(j, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
}

/* The path below root ("db/data.mdb") that abs names, or NULL. */
static const char *below_root(const char *abs)
{
	if (jfd < 0 || strncmp(abs, root, rootlen) != 0 || abs[rootlen] != '/')
		return NULL;
	return abs + rootlen + 1;
}

/* The path below root of the file open as fd, copied to out; 0 if none. */
static int fd_rel(int fd, char *out)
{
	char link[64], abs[PATH_MAX];
	if (jfd < 0)
		return 0;
	snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(link, abs, sizeof abs - 1);
	if (n <= 0)
		return 0;
	abs[n] = 0;
	if (strstr(abs, " (deleted)"))
		return 0;
	const char *rel = below_root(abs);
	if (!rel)
		return 0;
	strcpy(out, rel);
	return 1;
}

/* Resolve (dirfd, path) to a path below root, copied to out; 0 if none.
 * The directory part is resolved, the last component is kept as given. */
static int at_rel(int dirfd, const char *path, char *out)
{
	char dir[PATH_MAX], full[PATH_MAX * 2], rdir[PATH_MAX];
	if (jfd < 0)
		return 0;
	if (path[0] == '/') {
		snprintf(full, sizeof full, "%s", path);
	} else if (dirfd == AT_FDCWD) {
		if (!getcwd(dir, sizeof dir))
			return 0;
		snprintf(full, sizeof full, "%s/%s", dir, path);
	} else {
		char link[64];
		snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
		ssize_t n = readlink(link, dir, sizeof dir - 1);
		if (n <= 0)
			return 0;
		dir[n] = 0;
		snprintf(full, sizeof full, "%s/%s", dir, path);
	}
	char *slash = strrchr(full, '/');
	*slash = 0;
	if (!realpath(full[0] ? full : "/", rdir))
		return 0;
	char joined[PATH_MAX * 2];
	snprintf(joined, sizeof joined, "%s/%s", rdir, slash + 1);
	const char *rel = below_root(joined);
	if (!rel || strlen(rel) >= PATH_MAX)
		return 0;
	strcpy(out, rel);
	return 1;
}

static void note(const char *fmt, ...)
{
	char line[PATH_MAX * 2 + 64];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (n > 0 && (size_t)n < sizeof line) {
		int saved = errno;
		real_write(jfd, line, n);
		errno = saved;
	}
}

static void note_written(int fd, ssize_t done, long long off)
{
	char rel[PATH_MAX];
	if (done > 0 && fd_rel(fd, rel)) {
		int saved = errno;
		if (off < 0)
			off = (long long)lseek(fd, 0, SEEK_CUR) - done;
		errno = saved;
		note("W %s %lld %lld\n", rel, off, (long long)done);
	}
}

static void mkdirs_for(char *path)
{
	for (char *p = path + 1; *p; p++) {
		if (*p == '/') {
			*p = 0;
			mkdir(path, 0755);
			*p = '/';
		}
	}
}

/* Copy the current content of fd's file to the shadow tree. */
static int make_durable(int fd, const char *rel)
{
	char dst[PATH_MAX * 2], tmp[PATH_MAX * 2 + 64], abs[PATH_MAX * 2];
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
		return 0;
	snprintf(abs, sizeof abs, "%s/%s", root, rel);
	snprintf(dst, sizeof dst, "%s/%s", shadow, rel);
	snprintf(tmp, sizeof tmp, "%s.pcut-%d-%ld", dst, (int)getpid(), (long)gettid());
	mkdirs_for(dst);
	int in = open(abs, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		return -1;
	int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (out < 0) {
		close(in);
		return -1;
	}
	char buf[1 << 16];
	ssize_t n;
	int rc = 0;
	while ((n = read(in, buf, sizeof buf)) > 0) {
		if (real_write(out, buf, n) != n) {
			rc = -1;
			break;
		}
	}
	if (n < 0)
		rc = -1;
	close(in);
	close(out);
	if (rc == 0)
		rc = real_rename(tmp, dst);
	return rc;
}

static int synced(int fd, int (*real)(int))
{
	char rel[PATH_MAX];
	if (!fd_rel(fd, rel))
		return real(fd);
	int saved = errno;
	pthread_mutex_lock(&mu);
	/* Several processes (PostgreSQL's) may sync one file at once: a copy
	 * begun earlier must not be renamed over a newer one. */
	char lockpath[PATH_MAX + 16];
	snprintf(lockpath, sizeof lockpath, "%s/.pcut-lock", shadow);
	int lk = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
	if (lk >= 0)
		flock(lk, LOCK_EX);
	int rc = make_durable(fd, rel);
	if (rc == 0)
		note("S %s\n", rel);
	if (lk >= 0)
		close(lk);
	pthread_mutex_unlock(&mu);
	if (rc != 0)
		return -1;
	errno = saved;
	return 0;
}

ssize_t write(int fd, const void *buf, size_t n)
{
	ssize_t r = real_write(fd, buf, n);
	note_written(fd, r, -1);
	return r;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
	ssize_t r = real_pwrite(fd, buf, n, off);
	note_written(fd, r, off);
	return r;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
	ssize_t r = real_pwrite64(fd, buf, n, off);
	note_written(fd, r, off);
	return r;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
	ssize_t r = real_writev(fd, iov, cnt);
	note_written(fd, r, -1);
	return r;
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
	ssize_t r = real_pwritev(fd, iov, cnt, off);
	note_written(fd, r, off);
	return r;
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off)
{
	ssize_t r = real_pwritev64(fd, iov, cnt, off);
	note_written(fd, r, off);
	return r;
}

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
	ssize_t r = real_pwritev2(fd, iov, cnt, off, flags);
	note_written(fd, r, off);
	return r;
}

ssize_t sendfile(int out, int in, off_t *off, size_t n)
{
	ssize_t r = real_sendfile(out, in, off, n);
	note_written(out, r, -1);
	return r;
}

ssize_t copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t n, unsigned int flags)
{
	ssize_t r = real_copy_file_range(in, in_off, out, out_off, n, flags);
	note_written(out, r, out_off && r > 0 ? (long long)*out_off - r : -1);
	return r;
}

static int truncated(int fd, off_t len, int rc)
{
	char rel[PATH_MAX];
	if (rc == 0 && fd_rel(fd, rel))
		note("T %s %lld\n", rel, (long long)len);
	return rc;
}

int ftruncate(int fd, off_t len) { return truncated(fd, len, real_ftruncate(fd, len)); }
int ftruncate64(int fd, off_t len) { return truncated(fd, len, real_ftruncate64(fd, len)); }
int fsync(int fd) { return synced(fd, real_fsync); }
int fdatasync(int fd) { return synced(fd, real_fdatasync); }

static void renamed(int rc, int fa, const char *a, int fb, const char *b)
{
	char ra[PATH_MAX], rb[PATH_MAX], sa[PATH_MAX * 2], sb[PATH_MAX * 2];
	if (rc != 0)
		return;
	int ia = at_rel(fa, a, ra), ib = at_rel(fb, b, rb);
	if (!ia && !ib)
		return;
	int saved = errno;
	pthread_mutex_lock(&mu);
	if (ib) {
		snprintf(sb, sizeof sb, "%s/%s", shadow, rb);
		mkdirs_for(sb);
		if (ia) {
			snprintf(sa, sizeof sa, "%s/%s", shadow, ra);
			/* Never synced: the renamed file is durably empty. */
			if (real_rename(sa, sb) != 0)
				real_unlink(sb);
		} else {
			real_unlink(sb);
		}
		note("R %s %s\n", ia ? ra : "-", rb);
	} else {
		snprintf(sa, sizeof sa, "%s/%s", shadow, ra);
		real_unlink(sa);
		note("U %s\n", ra);
	}
	pthread_mutex_unlock(&mu);
	errno = saved;
}

int rename(const char *a, const char *b)
{
	int rc = real_rename(a, b);
	renamed(rc, AT_FDCWD, a, AT_FDCWD, b);
	return rc;
}

int renameat(int fa, const char *a, int fb, const char *b)
{
	int rc = real_renameat(fa, a, fb, b);
	renamed(rc, fa, a, fb, b);
	return rc;
}

int renameat2(int fa, const char *a, int fb, const char *b, unsigned int flags)
{
	int rc = real_renameat2(fa, a, fb, b, flags);
	renamed(rc, fa, a, fb, b);
	return rc;
}

static void unlinked(int rc, int dirfd, const char *path)
{
	char rel[PATH_MAX], s[PATH_MAX * 2];
	if (rc != 0 || !at_rel(dirfd, path, rel))
		return;
	int saved = errno;
	pthread_mutex_lock(&mu);
	snprintf(s, sizeof s, "%s/%s", shadow, rel);
	real_unlink(s);
	note("U %s\n", rel);
	pthread_mutex_unlock(&mu);
	errno = saved;
}

int unlink(const char *path)
{
	int rc = real_unlink(path);
	unlinked(rc, AT_FDCWD, path);
	return rc;
}

int unlinkat(int dirfd, const char *path, int flags)
{
	int rc = real_unlinkat(dirfd, path, flags);
	if (!(flags & AT_REMOVEDIR))
		unlinked(rc, dirfd, path);
	return rc;
}
