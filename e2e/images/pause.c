/*
 * carve's pause: the sandbox process of every pod on the local nodes
 * (carve.local/pause:v1, built by `carve-image` with gcc -static).
 *
 * It holds the pod's namespaces open and does nothing else: as PID 1 of the
 * pod it reaps every orphan that is reparented to it, it exits 0 on SIGINT or
 * SIGTERM, and otherwise sleeps in pause() forever. `pause -v` prints its
 * version and exits.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "carve pause v1"

static void on_stop(int signo) {
  static const char msg[] = "pause: shutting down\n";
  (void)signo;
  (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
  _exit(0);
}

static void on_child(int signo) {
  int saved = errno;
  (void)signo;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  errno = saved;
}

static int handle(int signo, void (*fn)(int), int flags) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = fn;
  sa.sa_flags = flags;
  sigemptyset(&sa.sa_mask);
  return sigaction(signo, &sa, NULL);
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts(VERSION);
    return 0;
  }
  if (argc > 1) {
    fprintf(stderr, "usage: %s [-v]\n", argv[0]);
    return 2;
  }
  if (getpid() != 1) {
    fprintf(stderr, "pause: warning: not PID 1, orphans are not reparented here\n");
  }
  if (handle(SIGINT, on_stop, 0) < 0 || handle(SIGTERM, on_stop, 0) < 0 ||
      handle(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART) < 0) {
    perror("pause: sigaction");
    return 1;
  }
  /* Children that exited before the handler was in place. */
  on_child(SIGCHLD);
  for (;;) {
    pause();
  }
}
